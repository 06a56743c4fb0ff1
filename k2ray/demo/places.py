"""The cities the demo model checks the weather for: every national capital and the 100 largest cities."""

from __future__ import annotations

NATIONAL_CAPITALS = (
    "Kabul", "Tirana", "Algiers", "Andorra la Vella", "Luanda", "Saint John's", "Buenos Aires", "Yerevan",
    "Canberra", "Vienna", "Baku", "Nassau", "Manama", "Dhaka", "Bridgetown", "Minsk", "Brussels", "Belmopan",
    "Porto-Novo", "Thimphu", "Sucre", "Sarajevo", "Gaborone", "Brasilia", "Bandar Seri Begawan", "Sofia",
    "Ouagadougou", "Gitega", "Praia", "Phnom Penh", "Yaounde", "Ottawa", "Bangui", "N'Djamena", "Santiago",
    "Beijing", "Bogota", "Moroni", "Kinshasa", "Brazzaville", "San Jose", "Yamoussoukro", "Zagreb", "Havana",
    "Nicosia", "Prague", "Copenhagen", "Djibouti", "Roseau", "Santo Domingo", "Dili", "Quito", "Cairo",
    "San Salvador", "Malabo", "Asmara", "Tallinn", "Mbabane", "Addis Ababa", "Suva", "Helsinki", "Paris",
    "Libreville", "Banjul", "Tbilisi", "Berlin", "Accra", "Athens", "Saint George's", "Guatemala City",
    "Conakry", "Bissau", "Georgetown", "Port-au-Prince", "Tegucigalpa", "Budapest", "Reykjavik", "New Delhi",
    "Jakarta", "Tehran", "Baghdad", "Dublin", "Jerusalem", "Rome", "Kingston", "Tokyo", "Amman", "Astana",
    "Nairobi", "Tarawa", "Pristina", "Kuwait City", "Bishkek", "Vientiane", "Riga", "Beirut", "Maseru",
    "Monrovia", "Tripoli", "Vaduz", "Vilnius", "Luxembourg", "Antananarivo", "Lilongwe", "Kuala Lumpur",
    "Male", "Bamako", "Valletta", "Majuro", "Nouakchott", "Port Louis", "Mexico City", "Palikir", "Chisinau",
    "Monaco", "Ulaanbaatar", "Podgorica", "Rabat", "Maputo", "Naypyidaw", "Windhoek", "Yaren", "Kathmandu",
    "Amsterdam", "Wellington", "Managua", "Niamey", "Abuja", "Pyongyang", "Skopje", "Oslo", "Muscat",
    "Islamabad", "Ngerulmud", "Panama City", "Port Moresby", "Asuncion", "Lima", "Manila", "Warsaw", "Lisbon",
    "Doha", "Bucharest", "Moscow", "Kigali", "Basseterre", "Castries", "Kingstown", "Apia", "San Marino",
    "Sao Tome", "Riyadh", "Dakar", "Belgrade", "Victoria", "Freetown", "Singapore", "Bratislava", "Ljubljana",
    "Honiara", "Mogadishu", "Pretoria", "Seoul", "Juba", "Madrid", "Colombo", "Khartoum", "Paramaribo",
    "Stockholm", "Bern", "Damascus", "Taipei", "Dushanbe", "Dodoma", "Bangkok", "Lome", "Nuku'alofa",
    "Port of Spain", "Tunis", "Ankara", "Ashgabat", "Funafuti", "Kampala", "Kyiv", "Abu Dhabi", "London",
    "Washington", "Montevideo", "Tashkent", "Port Vila", "Vatican City", "Caracas", "Hanoi", "Sanaa", "Lusaka",
    "Harare",
)
LARGEST_CITIES = (
    "Tokyo", "Delhi", "Shanghai", "Dhaka", "Sao Paulo", "Cairo", "Mexico City", "Beijing", "Mumbai", "Osaka",
    "Chongqing", "Karachi", "Kinshasa", "Lagos", "Istanbul", "Buenos Aires", "Kolkata", "Manila", "Guangzhou",
    "Tianjin", "Lahore", "Bangalore", "Rio de Janeiro", "Shenzhen", "Moscow", "Chennai", "Bogota", "Jakarta",
    "Lima", "Paris", "Bangkok", "Hyderabad", "Seoul", "Nagoya", "London", "Chengdu", "Tehran", "Nanjing",
    "Ho Chi Minh City", "Luanda", "Wuhan", "Xi'an", "Ahmedabad", "Kuala Lumpur", "New York", "Hangzhou",
    "Surat", "Suzhou", "Hong Kong", "Riyadh", "Shenyang", "Baghdad", "Dongguan", "Foshan", "Dar es Salaam",
    "Pune", "Santiago", "Madrid", "Haerbin", "Toronto", "Belo Horizonte", "Khartoum", "Johannesburg",
    "Singapore", "Dalian", "Qingdao", "Zhengzhou", "Ji'nan", "Barcelona", "Saint Petersburg", "Abidjan",
    "Yangon", "Fukuoka", "Alexandria", "Guadalajara", "Ankara", "Chittagong", "Addis Ababa", "Melbourne",
    "Nairobi", "Hanoi", "Sydney", "Monterrey", "Changsha", "Brasilia", "Cape Town", "Jiddah", "Urumqi",
    "Kunming", "Changchun", "Hefei", "Shantou", "Kabul", "Ningbo", "Tel Aviv", "Yaounde", "Rome",
    "Shijiazhuang", "Montreal", "Los Angeles",
)
ALL_CITIES = tuple(dict.fromkeys(NATIONAL_CAPITALS + LARGEST_CITIES))

